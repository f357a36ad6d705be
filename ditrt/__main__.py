from ditrt.cli import main

main()
