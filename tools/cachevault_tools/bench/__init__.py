"""``make bench``: product-path and component benchmarks with same-run anchors."""
