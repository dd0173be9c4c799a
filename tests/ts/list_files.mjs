// Lists every file through the proxy with the TypeScript SDK's auto-pagination and prints the ids
// as JSON: `client.files` (GA) or `client.beta.files`. The proxy key comes from FILES_PROXY_KEY.
import Anthropic from "@anthropic-ai/sdk";

const [baseURL, api, limit] = process.argv.slice(2);
const client = new Anthropic({ baseURL, apiKey: process.env.FILES_PROXY_KEY, maxRetries: 0 });
const files = api === "beta" ? client.beta.files : client.files;
const ids = [];
for await (const file of files.list({ limit: Number(limit) })) {
  ids.push(file.id);
}
console.log(JSON.stringify(ids));
