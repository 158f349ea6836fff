#!/bin/sh
# Stands in for a container runtime in examples/own_programs.py: a wrapper is any command that
# takes the program and its arguments, e.g. `apptainer exec -B /scratch image.sif`.
export ASKAP_WRAPPED=1
exec "$@"
