"""python -m fa2rt.bench: see fa2rt.bench's docstring (python -m fa2rt.bench --help)."""

from .cli import main

raise SystemExit(main())
