"""The project's benchmarks (installed as the package ``tbd_benchmarks``): accuracy, speed and
memory, soak, AMP, the teacher's learning curve and gradient norms. Each module is also a script;
see this folder's README.md for the commands and the results."""
