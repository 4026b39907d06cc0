"""The run directory: its layout, a node's weights and optimiser state, post-hoc EMA snapshots."""
