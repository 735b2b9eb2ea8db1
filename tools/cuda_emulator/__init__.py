"""The CUDA kernels of ``csrc/cuda`` run unchanged on a CPU model of the CUDA execution model.

``mock/`` models what the kernels use (blocks, one thread per CUDA thread, ``__syncthreads``,
warp shuffles, WMMA, dynamic shared memory filled with NaN bytes); ``<op>_emulator.cpp`` includes
``csrc/cuda/<op>.cu`` and calls its launchers (``csrc/cuda/<op>_cuda.h``) as the binding does.
The Python side, one module per op (``fkd``, ``srd``, ``rkd``), builds the driver with g++ under a
sanitizer (``build.py``, cached in ``build/cuda_emulator``), runs its cases and judges the results
against the float64 reference with ``fastkd.testing`` (its tolerance table and judgement).
``tests/emulator/`` runs the cases as pytest cases; each module also runs from the command line::

    python -m tools.cuda_emulator.fkd [--quick] [--sanitize thread] [--cases ID,...]
"""
