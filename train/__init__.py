"""`python -m train`: training, evaluation, cross-validation and statistics for xnorconv models on skin-lesion
image folders (paper 000's BinaryDNet53 recipe by default). Run from the repository root; see docs/training.md."""
import os

# OpenMP threads that wait for the others at the end of a parallel op sleep at once (GNU OpenMP's default spins
# first, then sleeps). When other processes use the same cores, a thread that spins holds the core which the thread
# it waits for needs, and every parallel op of the training step then lasts until the scheduler moves one of them:
# a BinaryDNet53 step with 2 threads on 2 shared cores took seconds instead of a fraction of one (measured in
# docs/training.md). OpenMP reads this once, when torch loads it, so it is set before anything imports torch; an
# OMP_WAIT_POLICY in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
