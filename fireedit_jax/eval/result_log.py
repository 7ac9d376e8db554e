"""A benchmark run's record on disk: OUT/results.jsonl (one line per finished or failed sample)
and OUT/run.json (the settings and the scorer), so a re-run resumes where one stopped.

DIR may be local or gs:// (storage.py): results.jsonl in a bucket is uploaded every 30 s
and on close (`storage.AppendFile`).
"""

from __future__ import annotations

import json

from fireedit_jax import storage


class RunSettingsError(ValueError):
    """An output directory holding results made with other edit settings or data."""


class ResultLog:
    """OUT/results.jsonl (the last line per key wins) and OUT/run.json (settings and scorer)."""

    def __init__(self, out_dir: str, settings: dict, scorer_description: dict):
        self.out_dir, self.settings = out_dir, settings
        out = storage.check_writable(out_dir, "--out")
        self._run_path = out / "run.json"
        self.rescore = False
        if self._run_path.exists():
            previous = json.loads(self._run_path.read_text())
            then = previous["settings"]
            differences = [f"{name}: {then.get(name)!r} then, {settings.get(name)!r} now"
                           for name in {**then, **settings} if then.get(name) != settings.get(name)]
            if differences:
                raise RunSettingsError(f"{out_dir!r} holds results made with other settings ("
                                       + "; ".join(differences) + "): use a new output directory")
            self.rescore = previous.get("scorer") != scorer_description
        if not self.rescore:
            self.write_run(scorer_description)
        self.records: dict[str, dict] = {}
        results = out / "results.jsonl"
        for line in results.read_text().splitlines() if results.exists() else []:
            if line.strip():
                record = json.loads(line)
                self.records[record["key"]] = record
        self._results = storage.AppendFile(results)

    def write_run(self, scorer_description: dict) -> None:
        """Records the settings and the scorer (after a re-scoring has finished, so an interrupted one resumes)."""
        self._run_path.write_text(json.dumps({"settings": self.settings, "scorer": scorer_description}, indent=1))

    def done(self, key: str) -> bool:
        record = self.records.get(key)
        if record is None or "error" in record:
            return False
        return (storage.as_path(self.out_dir) / record["output"]).exists()

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        self._results.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Uploads what a bucket's results.jsonl has not got yet."""
        self._results.close()
