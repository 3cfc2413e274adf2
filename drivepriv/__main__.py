from drivepriv.cli import main

raise SystemExit(main())
