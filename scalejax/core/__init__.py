"""Param metadata (roles, logical axes), the logical-axis sharding table, tree-path names,
sums in the form each backend runs fast."""
