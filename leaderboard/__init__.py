"""Leaderboard: aggregation, static HTML site, reference numbers, regression comparison."""
