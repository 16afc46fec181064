import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.CompletableFuture;

/**
 * A JVM client with the runtime's defaults, for socklb's tests: java.net.http.HttpClient
 * (HTTP/1.1 keep-alive, its own connection pool), which like every JVM socket opens a
 * dual-mode AF_INET6 socket and connects to ::ffff:a.b.c.d for an IPv4 address.
 *
 * Usage: java PoolClient.java URL N. Each line read on stdin (and once at the start) sends N
 * requests at once, so the pool holds N connections, reused from the second round on; each
 * round prints one JSON line {"pods":{"pod-1":4,...},"failed":0}. Every failed request counts
 * as failed: nothing is retried here (HttpClient itself retries nothing for a GET that got
 * an answer). End of input ends the program, closing the pool.
 */
public class PoolClient {
    public static void main(String[] args) throws Exception {
        URI uri = URI.create(args[0]);
        int n = Integer.parseInt(args[1]);
        HttpClient client = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1).build();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line = "";
        while (line != null) {
            List<CompletableFuture<HttpResponse<String>>> calls = new ArrayList<>();
            for (int i = 0; i < n; i++) {
                HttpRequest request = HttpRequest.newBuilder(uri).GET().build();
                calls.add(client.sendAsync(request, HttpResponse.BodyHandlers.ofString()));
            }
            Map<String, Integer> pods = new TreeMap<>();
            int failed = 0;
            for (CompletableFuture<HttpResponse<String>> call : calls) {
                try {
                    HttpResponse<String> response = call.join();
                    if (response.statusCode() != 200) {
                        failed++;
                        continue;
                    }
                    pods.merge(response.body().trim(), 1, Integer::sum);
                } catch (Exception e) {
                    System.err.println("request failed: " + e);
                    failed++;
                }
            }
            StringBuilder out = new StringBuilder("{\"pods\":{");
            String sep = "";
            for (Map.Entry<String, Integer> e : pods.entrySet()) {
                out.append(sep).append('"').append(e.getKey()).append("\":").append(e.getValue());
                sep = ",";
            }
            out.append("},\"failed\":").append(failed).append('}');
            System.out.println(out);
            System.out.flush();
            line = in.readLine();
        }
    }
}
