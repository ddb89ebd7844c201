"""kaas command-line tools: kaasctl, kaas-bench, the demo behind ``make run``."""
