"""Benchmark tables: `python -m fastdiff.bench <table>`; each fastdiff figure beside its baseline, measured in the same run."""
