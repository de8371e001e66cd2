// Command gitops-check says what two GitOps tools make of ImageBatchJob objects, with their own
// code: kstatus (sigs.k8s.io/cli-utils, what Flux's health checks and `kubectl wait`-style
// tooling use) and an Argo CD Lua health check run by gopher-lua, the interpreter Argo CD embeds,
// with the libraries Argo CD opens for health scripts (base, table, package; no string, no os).
//
//	gitops-check kstatus FILE...   one JSON line per object: {"path", "status", "message"}
//	gitops-check argocd DIR        runs DIR/health.lua over DIR/health_test.yaml as Argo CD's
//	                               resource_customizations test does; one JSON line per case
//	                               {"path", "want", "got", "error"}; exit 1 if any case differs
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type health struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

type healthTests struct {
	Tests []struct {
		HealthStatus health `json:"healthStatus"`
		InputPath    string `json:"inputPath"`
	} `json:"tests"`
}

func readObject(path string) (map[string]any, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	// As the API's JSON is decoded for kstatus (and Argo CD): integers as int64, not float64.
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(js); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return u.Object, nil
}

func emit(v any) {
	line, _ := json.Marshal(v)
	fmt.Println(string(line))
}

func kstatus(paths []string) int {
	for _, path := range paths {
		obj, err := readObject(path)
		if err != nil {
			emit(map[string]string{"path": path, "error": err.Error()})
			return 2
		}
		res, err := status.Compute(&unstructured.Unstructured{Object: obj})
		if err != nil {
			emit(map[string]string{"path": path, "error": err.Error()})
			return 2
		}
		emit(map[string]string{"path": path, "status": res.Status.String(), "message": res.Message})
	}
	return 0
}

// decode turns a decoded YAML/JSON value into a Lua value, as Argo CD's util/lua decodeValue does.
func decode(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case map[string]any:
		t := l.NewTable()
		for k, item := range v {
			t.RawSetString(k, decode(l, item))
		}
		return t
	case []any:
		t := l.NewTable()
		for _, item := range v {
			t.Append(decode(l, item))
		}
		return t
	case string:
		return lua.LString(v)
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case nil:
		return lua.LNil
	}
	return lua.LString(fmt.Sprint(value))
}

func runHealth(script string, obj map[string]any) (health, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		l.Push(l.NewFunction(lib.open))
		l.Push(lua.LString(lib.name))
		l.Call(1, 0)
	}
	l.SetGlobal("obj", decode(l, obj))
	if err := l.DoString(script); err != nil {
		return health{}, err
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return health{}, fmt.Errorf("the script returned %s, not a table", l.Get(-1).Type())
	}
	got := health{Status: lua.LVAsString(ret.RawGetString("status")), Message: lua.LVAsString(ret.RawGetString("message"))}
	switch got.Status {
	case "Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown":
		return got, nil
	}
	return got, fmt.Errorf("%q is not an Argo CD health status", got.Status)
}

func argocd(dir string) int {
	script, err := os.ReadFile(filepath.Join(dir, "health.lua"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	data, err := os.ReadFile(filepath.Join(dir, "health_test.yaml"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	var tests healthTests
	if err := yaml.Unmarshal(data, &tests); err != nil || len(tests.Tests) == 0 {
		fmt.Fprintf(os.Stderr, "health_test.yaml: no tests (%v)\n", err)
		return 2
	}
	rc := 0
	for _, tc := range tests.Tests {
		out := map[string]any{"path": tc.InputPath, "want": tc.HealthStatus}
		obj, err := readObject(filepath.Join(dir, tc.InputPath))
		if err == nil {
			var got health
			got, err = runHealth(string(script), obj)
			out["got"] = got
			if err == nil && got != tc.HealthStatus {
				rc = 1
			}
		}
		if err != nil {
			out["error"] = err.Error()
			rc = 1
		}
		emit(out)
	}
	return rc
}

func main() {
	if len(os.Args) >= 3 && os.Args[1] == "kstatus" {
		os.Exit(kstatus(os.Args[2:]))
	}
	if len(os.Args) == 3 && os.Args[1] == "argocd" {
		os.Exit(argocd(os.Args[2]))
	}
	fmt.Fprintln(os.Stderr, "usage: gitops-check kstatus FILE... | gitops-check argocd DIR")
	os.Exit(2)
}
