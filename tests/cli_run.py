"""`agentsd ARGS` run in the test's process, as the CLI tests read it."""


def run_main(capsys, *args):
    """(exit code, stdout, the `agentsd: error:` lines of stderr) of `agentsd ARGS`."""
    from agentsd.cli.commands import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("agentsd: error:")]
