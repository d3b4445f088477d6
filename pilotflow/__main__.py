from pilotflow.cli import main

raise SystemExit(main())
