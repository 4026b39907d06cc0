"""Schedules of nodes, the local runner, and the seeded experiments that test the paper's claims."""
