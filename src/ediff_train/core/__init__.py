"""The maths: EDM preconditioning and loss, the expert tree, conditioning, solvers, SR
conditioning, EMA, learning-rate schedules. Depends only on `io` and `errors`."""
