from fpolicyd.cli.main import main

raise SystemExit(main())
