// Copies the browser build of @msgpack/msgpack into the Python package, so that
// `pip install .` ships the chat page without needing npm. Run after `npm ci`.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const source = join(here, "node_modules", "@msgpack", "msgpack");
const target = join(here, "..", "msgnet", "web", "vendor", "msgpack.min.js");

const manifest = JSON.parse(readFileSync(join(source, "package.json"), "utf8"));
const license = readFileSync(join(source, "LICENSE"), "utf8").trim();
const code = readFileSync(join(source, "dist.umd", "msgpack.min.js"), "utf8");

// The license asks for its notice in every copy; the source map is left out.
const header =
  `/*! ${manifest.name} ${manifest.version}, ${manifest.license} license.\n` +
  `${license.replaceAll("*/", "* /")}\n*/\n`;
const body = code.replace(/\n\/\/# sourceMappingURL=.*\s*$/, "\n");

mkdirSync(dirname(target), { recursive: true });
writeFileSync(target, header + body);
console.log(`wrote ${target} (${manifest.name} ${manifest.version})`);
