"""Speed and memory benchmarks: ratios measured side by side in one run, printed and written as JSON."""
