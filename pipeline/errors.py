"""The one exception type for user errors.

Anything raised as ``UserError`` is printed by the CLI as a single line (no traceback) and the
process exits with status 2. Bugs stay ordinary exceptions, with their traceback.
"""


class UserError(Exception):
    """Bad input, a missing file, a refused cache: something the user can fix."""
