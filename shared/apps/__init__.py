"""Command-line apps on top of the library: the demos (``python -m shared.apps.demo``,
``shared.apps.demo_segpruner``, ``shared.apps.demo_fast3d``), the papers' efficiency figures beside ours
(``python -m shared.paper_tables``), the method × host matrix (``python -m shared.apps.matrix``), and
Fast3D's GAP training/prediction (``shared.apps.fast3d_train``, needs accelerate) and SAP α search
(``shared.apps.fast3d_alpha``); tiny random GAP stand-ins (``shared.apps.fast3d_tiny``)."""
