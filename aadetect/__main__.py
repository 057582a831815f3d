from aadetect.cli import main

main()
