from .daemon._main import main

raise SystemExit(main())
