"""The paper's pieces, usable in any model: norms with pluggable scale forms (HG branches),
named variants, role-aware weight decay."""
