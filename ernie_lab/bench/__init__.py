"""Benches: speed figures against transformers (``bench``), quantized/offloaded variants
(``bench_quant``), tensor parallel on CPU processes (``tp_bench``) and the deterministic operator
counter (``op_count``). A bench measures generation, it is not part of it; every module is imported
on demand (``bench`` and ``bench_quant`` need transformers)."""
