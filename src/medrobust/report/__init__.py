"""The robustness report: one tidy metrics table (`summary`), its figures
(`figures`) and the self-contained HTML page (`html`)."""
