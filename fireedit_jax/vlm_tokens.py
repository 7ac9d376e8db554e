"""FireEdit's new LLM tokens, in id order after the base vocabulary (data/tokenizer.py adds them to a
tokenizer; models/vlm.py finds their ids): placeholders, delimiters, then the learnable [IMG_i]."""

NUM_IMG_TOKENS = 32
PLACEHOLDERS = ("<image>", "<region>")
DELIMITERS = ("<im_start>", "<im_end>")
IMG_TOKENS = tuple(f"[IMG_{i}]" for i in range(1, NUM_IMG_TOKENS + 1))
NEW_TOKENS = PLACEHOLDERS + DELIMITERS + IMG_TOKENS
