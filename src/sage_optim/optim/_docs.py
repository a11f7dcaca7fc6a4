"""Docstring fragments shared by the optimizer classes (written once)."""

COMMON_ARGS = r"""
        foreach (bool, optional): batch element-wise work with ``torch._foreach_*`` ops and same-shape
            matrices with batched mat-vecs. ``None`` (default) picks foreach when every parameter is on CUDA,
            like torch.optim. The for-loop path is the reference; both are tested against it in float64.
        maximize (bool): maximise the objective instead of minimising it. Default ``False``.
        nonfinite ("raise" | "skip"): what to do when any gradient holds NaN or Inf. ``"raise"`` (default)
            raises :class:`~sage_optim.NonFiniteGradientError` naming the parameter and updates nothing;
            ``"skip"`` skips the whole step and counts it in ``optimizer.skipped_steps``.
        compile (bool): run each tensor's element-wise update as one ``torch.compile`` kernel (no full-size
            temporaries; hyperparameters enter as 0-D tensors so LR schedules do not recompile). Needs a
            working ``torch.compile`` backend (a C++ compiler on CPU, Triton on CUDA). Default ``False``.
        fused (bool, optional): run SAGE/Lion/SinkGD steps through the Triton kernels of
            :mod:`sage_optim.kernels` (SAGE: one pass for the column statistic, one for θ and m; SinkGD: one
            sweep over G per Sinkhorn iteration, one for θ). ``None`` (default) picks them when every
            parameter of a group is on CUDA, Triton is installed (the ``[triton]`` extra) and neither
            ``foreach`` nor ``compile`` was chosen explicitly; ``True`` on
            CPU tensors raises ``ValueError`` unless ``TRITON_INTERPRET=1``. AdamW groups are unaffected.
        verify_every (int | None): under FSDP2/DTensor sharding, every N steps gather one sharded parameter
            and check that the sharded update equals the single-process one; raise ``RuntimeError`` naming
            it otherwise (:func:`sage_optim.distributed.verify_step`). Default ``None`` (off)."""

STATE_DTYPE_ARG = r"""
        state_dtype (torch.dtype | str | None): dtype of the momentum ``exp_avg``. ``None`` (default) keeps
            float32 for bf16/fp16 parameters and the parameter's dtype otherwise. ``torch.bfloat16`` halves the
            momentum's memory; it is updated in float32 and rounded to nearest on store. ``torch.int8``
            (SAGE/Lion rules) keeps 8-bit codes in blocks of 256 with one float32 maximum each (1.016 bytes
            per element), decoded per block for the update and stored with unbiased stochastic rounding
            (:mod:`sage_optim.functional._quant`); FSDP2 ``Shard(0)`` shards store the same codes as one
            process (docs/distributed.md). The state dtype survives ``load_state_dict`` (torch would
            otherwise cast state to the parameter dtype)."""
