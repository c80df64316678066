from lookahead.cli import main

main()
