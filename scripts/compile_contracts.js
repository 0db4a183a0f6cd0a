#!/usr/bin/env node
// Compile contracts/**/*.sol offline with the solc-js JS API into build/contracts/<Name>.json.
// Why the JS API and not `solcjs --standard-json`: the CLI truncates output read through a pipe (exit code 0).
// Exits non-zero on any compiler error, so `make bootstrap` and CI fail loudly.
"use strict";

const fs = require("fs");
const path = require("path");
const solc = require("solc");

const ROOT = path.resolve(__dirname, "..");
const SRC = path.join(ROOT, "contracts");
const OUT = path.join(ROOT, "build", "contracts");
const NODE_MODULES = path.join(ROOT, "node_modules");
// anvil 1.7.1 runs the latest hardfork; "cancun" is the oldest with transient storage (ReentrancyGuardTransient).
const EVM_VERSION = "cancun";

function listSources(dir) {
  const out = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...listSources(full));
    else if (entry.name.endsWith(".sol")) out.push(full);
  }
  return out.sort();
}

function findImports(importPath) {
  const candidates = [path.join(NODE_MODULES, importPath), path.join(SRC, importPath), path.join(ROOT, importPath)];
  for (const candidate of candidates) {
    if (fs.existsSync(candidate)) return { contents: fs.readFileSync(candidate, "utf8") };
  }
  return { error: `import not found: ${importPath}` };
}

function main() {
  const files = listSources(SRC);
  if (files.length === 0) {
    console.error(`no .sol files under ${SRC}`);
    process.exit(1);
  }
  const sources = {};
  for (const file of files) {
    sources[path.relative(SRC, file).split(path.sep).join("/")] = { content: fs.readFileSync(file, "utf8") };
  }
  const input = {
    language: "Solidity",
    sources,
    settings: {
      optimizer: { enabled: true, runs: 200 },
      evmVersion: EVM_VERSION,
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const diagnostics = output.errors || [];
  let failed = false;
  for (const diag of diagnostics) {
    const file = (diag.sourceLocation && diag.sourceLocation.file) || "";
    // OpenZeppelin's own advisory warnings (e.g. on transient storage) are not ours to act on.
    if (diag.severity !== "error" && file.startsWith("@openzeppelin/")) continue;
    console.error(diag.formattedMessage || diag.message);
    if (diag.severity === "error") failed = true;
  }
  if (failed) process.exit(1);

  fs.mkdirSync(OUT, { recursive: true });
  let written = 0;
  for (const [source, contracts] of Object.entries(output.contracts || {})) {
    if (!(source in sources)) continue; // OpenZeppelin dependencies are not artefacts of ours
    for (const [name, artefact] of Object.entries(contracts)) {
      const bytecode = artefact.evm.bytecode.object;
      if (!bytecode) continue; // interfaces and abstract contracts have nothing to deploy
      const json = {
        contractName: name,
        sourceName: source,
        compiler: solc.version(),
        evmVersion: EVM_VERSION,
        abi: artefact.abi,
        bytecode: "0x" + bytecode,
        deployedBytecode: "0x" + artefact.evm.deployedBytecode.object,
      };
      fs.writeFileSync(path.join(OUT, `${name}.json`), JSON.stringify(json, null, 2) + "\n");
      written += 1;
    }
  }
  if (written === 0) {
    console.error("compilation produced no deployable contract");
    process.exit(1);
  }
  console.error(`compiled ${written} contract(s) with solc ${solc.version()} into ${path.relative(ROOT, OUT)}`);
}

main();
