from .selfcheck import main

raise SystemExit(main())
