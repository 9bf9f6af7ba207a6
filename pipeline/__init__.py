"""The ``hessov`` pipeline: the command line, its stages and the launchers of the stage graph.

Data flows one way: the run config, then a stage, then files in the run directory
(:mod:`pipeline.rundir`), then the next stage. README.md's module map says where each part lives.
"""
