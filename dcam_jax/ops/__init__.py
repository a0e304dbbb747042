"""Generic array operations used by the refinement modules: order statistics without a sort (``order``) and
Batcher sorting networks (``sorting``)."""
