from .cli import main
from .launch import exit_process

exit_process(main())
