from streamhash.eval.cli import main

raise SystemExit(main())
