"""One run: its sources, build, transfer set-up, module, fit, results; the checks before a run or sweep."""
