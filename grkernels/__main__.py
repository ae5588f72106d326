from grkernels.cli import main

raise SystemExit(main())
