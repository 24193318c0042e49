"""``python -m shared.paper_tables``: the app ``shared.apps.paper_tables`` under its short name."""
from .apps.paper_tables import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
