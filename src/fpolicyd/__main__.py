from fpolicyd.cli import main

raise SystemExit(main())
