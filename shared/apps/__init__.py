"""Command-line apps on top of the library: the demos (``python -m shared.apps.demo``,
``shared.apps.demo_segpruner``), the papers' efficiency figures beside ours
(``python -m shared.paper_tables``) and the method × host matrix (``python -m shared.apps.matrix``)."""
