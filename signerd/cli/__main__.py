"""python -m signerd.cli: signerctl."""

from . import main

raise SystemExit(main())
