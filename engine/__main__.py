from radflash.cli import main

main()
