from ._daemon import main

raise SystemExit(main())
