from streamhash.cli import main

raise SystemExit(main())
