"""Solvers shared by several tasks (batched SVM, linear probe)."""
