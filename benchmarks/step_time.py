"""Step time of sage-optim's optimizers vs torch AdamW, measured side by side in one run.

The benchmark lives in the package (``sage_optim.bench``) so that ``sage-optim bench`` runs it on any
install; this script is the same thing from a checkout:

    python benchmarks/step_time.py [--preset llama-130m|llama-1.3b-layer] [--repeats 5] [--device cpu]
"""
from sage_optim.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
