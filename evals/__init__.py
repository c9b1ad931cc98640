"""Review and offline evaluation: eval sets, metrics, runners, reports and drift."""
