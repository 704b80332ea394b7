from tinytune.cli import main

raise SystemExit(main())
